"""fastsd: fast Stable Diffusion text-to-image and image-to-image, served by Cog."""
