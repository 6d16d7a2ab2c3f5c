"""How the VAE decodes: whole, in tiles or one image at a time (a memory lever: it bounds the decode's peak
memory; a memory plan chooses it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qwendoctor.errors import UsageError
from qwendoctor.levers.base import Field, Lever, Offer

if TYPE_CHECKING:
    from qwendoctor.profile import Profile


# tiled: diffusers decodes the latents in overlapping tiles (256 px, stride 192) and blends the seams: peak memory
# bounded by a tile instead of the image, the image close to the full decode but not equal (the seams are blended).
# sliced: one image of a batch at a time; a batch of one decodes exactly as `full`.
VAE_DECODES = ("full", "tiled", "sliced")


def apply_vae_decode(pipe, profile: "Profile"):
    vae = getattr(pipe, "vae", None)
    if vae is None:
        if profile.vae_decode != "full":
            raise UsageError(f"profile.vae_decode = {profile.vae_decode!r} changes the pipeline's VAE, and this "
                             "pipeline has none (vae=None)")
        return pipe
    # Both ways, so a used pipeline can be re-applied.
    (vae.enable_tiling if profile.vae_decode == "tiled" else vae.disable_tiling)()
    (vae.enable_slicing if profile.vae_decode == "sliced" else vae.disable_slicing)()
    return pipe


VAE_DECODE = Lever(
    name="vae_decode", apply=apply_vae_decode, undoable=True,
    fields=(Field("vae_decode", str, "full", choices=VAE_DECODES, omit_default=True),),
    offer=lambda ctx: Offer({"vae_decode": ("full",)}),
    sample=lambda trial, offer, chosen, ctx: {"vae_decode": "full"},
    lossy=lambda p: p.vae_decode == "tiled",
    describe=lambda p: f"vae={p.vae_decode}" if p.vae_decode != "full" else None,
)
