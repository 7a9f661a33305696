"""fastsd: fast image generation served by Cog: every fast recipe for the SD1.5 and SDXL UNets and
the distilled transformers (FLUX.2 [klein], Z-Image-Turbo, FLUX.1 [schnell]), from one catalogue,
for text-to-image, image-to-image, inpainting, editing from reference images and ControlNet.

The code map, module by module, and the per-call path: docs/development.md.
"""
