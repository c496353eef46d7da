"""sdgen.diffusion"""
