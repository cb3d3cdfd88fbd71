"""The report's pages at any number of slides: the index (summary, plots, a sortable and filterable
slide table fed from ``slides.js``, paged), one page per slide (``slides/{slide_id}.html``), and the
picture cache (``img/pictures.json``: a picture is drawn again only when its slide's fates or
detection files change). Everything works from disk (``file://``), without a server."""

from __future__ import annotations

import hashlib
import html
import json
from pathlib import Path

import polars as pl

from cytosyn_data.io.atomic import atomic_write_bytes
from cytosyn_data.run.paths import DetectFiles

__all__ = ["PictureCache", "slide_page", "slides_js", "TABLE_SCRIPT"]

#: bump when the drawing of slide pictures changes: every picture is drawn again once
PICTURE_VERSION = "2"

#: the slide table's columns (slides.parquet, plus tiles by fate)
TABLE_COLUMNS = ("slide_id", "status", "tss", "project", "mpp", "n_candidates", "n_selected", "tiles", "train",
                 "val_in", "val_out", "removed", "tissue_area_fraction", "qc_warning", "error")


class PictureCache:
    """``img/pictures.json``: slide_id -> the digest of what its picture was drawn from."""

    def __init__(self, img_dir: Path):
        self.path = img_dir / "pictures.json"
        self.old = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.new: dict[str, str] = {}

    @staticmethod
    def digest(run: Path, sid: str, fates: pl.DataFrame) -> str:
        """What a slide's picture depends on: its fates and its detection pictures' identity."""
        h = hashlib.sha256(PICTURE_VERSION.encode())
        h.update(fates.sort("key").write_ipc(None, compression="uncompressed").getvalue())
        files = DetectFiles.of_run(run, sid)
        for p in (files.view, files.mask, files.thumb):
            st = p.stat() if p.exists() else None
            h.update(f"{p.name}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1}".encode())
        return h.hexdigest()

    def current(self, sid: str, digest: str, picture: Path) -> bool:
        return self.old.get(sid) == digest and picture.exists()

    def save(self) -> None:
        atomic_write_bytes(self.path, json.dumps(self.new, sort_keys=True).encode(), durable=False)


def slides_js(rows: list[dict]) -> bytes:
    """``window.SLIDES = [...]``: the table's rows as a script (a file:// page may not fetch JSON)."""
    cols = list(TABLE_COLUMNS)
    data = [[r.get(c) for c in cols] for r in rows]
    return ("window.SLIDE_COLUMNS=" + json.dumps(cols) + ";\nwindow.SLIDES=" +
            json.dumps(data, separators=(",", ":"), default=str) + ";\n").encode()


def slide_page(slide: dict, counts: dict[str, int], pictured: bool) -> str:
    """The body of one slide's page: its picture, its tiles by fate, its facts, warning and error."""
    sid = html.escape(slide["slide_id"])
    facts = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in slide.items() if v is not None and k != "slide_id")
    fates = ", ".join(f"{html.escape(f)} {n}" for f, n in sorted(counts.items())) or "no tiles"
    pic = (f'<a href="../img/{sid}.jpg"><img src="../img/{sid}.jpg" alt="{sid}"></a>' if pictured
           else '<p class="missing">picture unavailable (see the warning of the run)</p>')
    return (f'<p><a href="../index.html">&larr; all slides</a></p><h1>{sid}</h1><p>tiles: {fates}</p>'
            f"{pic}<h2>Facts</h2><table>{facts}</table>")


TABLE_SCRIPT = r"""<script src="slides.js"></script><script>
(function(){
var C=window.SLIDE_COLUMNS,R=window.SLIDES,S={sort:'slide_id',dir:1,q:'',show:'all',page:0},PAGE=100;
function readHash(){var h=location.hash.slice(1).split('&');for(var i=0;i<h.length;i++){var kv=h[i].split('=');
 if(kv[0]==='sort'){var p=decodeURIComponent(kv[1]).split(':');S.sort=p[0];S.dir=p[1]==='desc'?-1:1;}
 else if(kv[0]==='q')S.q=decodeURIComponent(kv[1]);else if(kv[0]==='show')S.show=kv[1];
 else if(kv[0]==='page')S.page=parseInt(kv[1])||0;}}
function rows(){var ci=C.indexOf(S.sort),q=S.q.toLowerCase(),st=C.indexOf('status'),w=C.indexOf('qc_warning');
 var out=R.filter(function(r){if(S.show==='failed'&&r[st]==='ok')return false;if(S.show==='warnings'&&!r[w])return false;
  if(!q)return true;return [r[0],r[C.indexOf('tss')],r[C.indexOf('project')]].join(' ').toLowerCase().indexOf(q)>=0;});
 out.sort(function(a,b){var x=a[ci],y=b[ci];if(x===y)return a[0]<b[0]?-1:1;if(x===null)return 1;if(y===null)return -1;
  return (x<y?-1:1)*S.dir;});return out;}
function cell(v){if(v===null)return '';if(typeof v==='number'&&v%1!==0)return v.toPrecision(3);
 return String(v).replace(/&/g,'&amp;').replace(/</g,'&lt;');}
function draw(){var rs=rows(),n=Math.max(1,Math.ceil(rs.length/PAGE));S.page=Math.min(S.page,n-1);
 var body=rs.slice(S.page*PAGE,(S.page+1)*PAGE).map(function(r){return '<tr>'+r.map(function(v,i){
  return i===0?'<td><a href="slides/'+encodeURIComponent(v)+'.html">'+cell(v)+'</a></td>':'<td>'+cell(v)+'</td>';}).join('')+'</tr>';});
 document.getElementById('slide-rows').innerHTML=body.join('');
 document.getElementById('slide-count').textContent=rs.length;
 document.getElementById('slide-page').textContent=(S.page+1)+' / '+n;
 document.body.setAttribute('data-table',rs.length+':'+S.sort+':'+(S.dir>0?'asc':'desc'));}
function go(){location.hash='sort='+S.sort+':'+(S.dir>0?'asc':'desc')+'&q='+encodeURIComponent(S.q)+'&show='+S.show+'&page='+S.page;draw();}
window.addEventListener('load',function(){readHash();
 document.getElementById('slide-head').innerHTML='<tr>'+C.map(function(c){return '<th data-col="'+c+'">'+c+'</th>';}).join('')+'</tr>';
 document.getElementById('slide-head').onclick=function(e){var c=e.target.getAttribute('data-col');if(!c)return;
  S.dir=(S.sort===c)?-S.dir:1;S.sort=c;S.page=0;go();};
 var q=document.getElementById('slide-q');q.value=S.q;q.oninput=function(){S.q=q.value;S.page=0;go();};
 var sh=document.getElementById('slide-show');sh.value=S.show;sh.onchange=function(){S.show=sh.value;S.page=0;go();};
 document.getElementById('prev').onclick=function(){S.page=Math.max(0,S.page-1);go();};
 document.getElementById('next').onclick=function(){S.page++;go();};draw();});
})();</script>"""
