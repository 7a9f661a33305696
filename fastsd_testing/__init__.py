"""Test and benchmark helpers: random-weight models in the hub layouts, the Cog server launcher. Not in the image."""
