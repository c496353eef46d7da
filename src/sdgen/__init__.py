"""sdgen: Stable Diffusion in compact PyTorch, loading real checkpoint formats."""

__version__ = "0.1.0"


def load(path=None, **options):
    """Load a model (diffusers folder, .safetensors or .ckpt); None means the embedded model."""
    from sdgen.pipelines.loading import load_pipeline

    return load_pipeline(path, **options)
