"""umarvel-ray: universal multimodal retrieval (U-MARVEL recipe) on Ray."""

__version__ = "0.1.0"
