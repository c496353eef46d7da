"""sdgen: Stable Diffusion in compact PyTorch, loading real checkpoint formats."""

__version__ = "0.1.0"


def load(path=None, *, safety_checker: bool = True, watermark: bool = True, **options):
    """Load a model (diffusers folder, .safetensors or .ckpt); None means the embedded model.

    A folder's `safety_checker/` screens every image unless `safety_checker=False`; images of
    256 px or more carry an invisible watermark unless `watermark=False` (see sdgen.provenance).
    """
    from sdgen.pipelines.loading import load_pipeline
    from sdgen.provenance import attach_provenance

    return attach_provenance(load_pipeline(path, **options), path, safety_checker=safety_checker, watermark=watermark)
