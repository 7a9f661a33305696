"""fastsd: fast image generation served by Cog: every fast recipe for the SD1.5 and SDXL UNets and
the distilled transformers (FLUX.2 [klein], Z-Image-Turbo, FLUX.1 [schnell]), from one catalogue,
for text-to-image, image-to-image, inpainting, editing from reference images and ControlNet.

The code map, module by module, and the per-call path: docs/development.md.
"""

import logging

# diffusers 0.42 looks, as it is imported, for torchao classes that torchao 0.18 removed, and warns on
# every start that torchao-serialized checkpoints may not load; fastsd quantizes at load (FASTSD_FP8)
# and never reads such checkpoints. The filter must exist before diffusers is first imported.
logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").addFilter(
    lambda record: "Unable to import `torchao` Tensor objects" not in record.getMessage()
)
