"""Provenance and screening of generated images: the Stable Diffusion safety checker and the invisible watermark."""
