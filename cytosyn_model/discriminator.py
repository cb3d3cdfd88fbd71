"""taming-transformers' PatchGAN discriminator (NLayerDiscriminator, BatchNorm) with its weight
initialisation: the adversarial term of REPA-E's VAE loss."""

from __future__ import annotations

from torch import nn

__all__ = ["PatchDiscriminator", "taming_weights_init"]


def taming_weights_init(m: nn.Module) -> None:
    """taming-transformers' ``weights_init``: conv weights N(0, 0.02) (biases keep PyTorch's default),
    BatchNorm weights N(1, 0.02) and biases 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.constant_(m.bias, 0.0)


class PatchDiscriminator(nn.Module):
    """PatchGAN (taming's NLayerDiscriminator, 3 layers, BatchNorm): [B, 3, H, W] -> logits [B, 1, h, w].

    Module names (``main.N``) and initialisation equal taming/REPA-E, so their weights load."""

    def __init__(self, ch: int = 64, layers: int = 3):
        super().__init__()
        seq = [nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(ch * prev, ch * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ch * mult), nn.LeakyReLU(0.2, True)]
        seq += [nn.Conv2d(ch * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*seq)
        self.apply(taming_weights_init)

    def forward(self, x):
        return self.main(x)
