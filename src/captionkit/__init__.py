"""captionkit: turn images into text with any captioning model, batched, resumable and scored."""

from captionkit.api import Model, load
from captionkit.gate import GateOptions
from captionkit.models import Caption, Captioner
from captionkit.options import GenerationOptions, LoadOptions
from captionkit.pipeline import Pipeline, RunOptions, RunSummary

__version__ = "0.1.0"

__all__ = ["Caption", "Captioner", "GateOptions", "GenerationOptions", "LoadOptions", "Model", "Pipeline",
           "RunOptions", "RunSummary", "__version__", "load"]
