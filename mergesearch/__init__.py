"""mergesearch: evolutionary, multi-objective search over model-merge recipes."""

from mergesearch.recipe import Recipe, RecipeError

__version__ = "0.1.0"
__all__ = ["Recipe", "RecipeError", "__version__"]
