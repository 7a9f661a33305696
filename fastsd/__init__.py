"""fastsd: fast image generation served by Cog: every fast recipe for the SD1.5 and SDXL UNets, from
one catalogue, for text-to-image, image-to-image, inpainting and ControlNet.

The code map, module by module, and the per-call path: docs/development.md.
"""
