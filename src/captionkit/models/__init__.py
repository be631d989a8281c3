"""Captioning models behind one interface, found through one registry."""

from captionkit.models.base import Caption, Captioner, CaptionerWrapper
from captionkit.models.registry import FAMILIES, MODELS, SCHEMES, ModelSpec, choose_auto, load, register

__all__ = ["FAMILIES", "MODELS", "SCHEMES", "Caption", "Captioner", "CaptionerWrapper", "ModelSpec",
           "choose_auto", "load", "register"]
