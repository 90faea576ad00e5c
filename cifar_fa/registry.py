"""The recipes by name, as timm's `list_models` / `create_model` find models: each recipe script is declared once, as an
entry point of the `cifar_fa.recipes` group (setup.cfg), and loaded only when asked for."""
from __future__ import annotations

import functools
from importlib.metadata import EntryPoint, entry_points

from .config import Recipe

__all__ = ['list_recipes', 'get_recipe', 'recipe_script']


@functools.cache
def _entries() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group='cifar_fa.recipes')}


def list_recipes() -> list[str]:
    """Names of the installed recipes (`s7`, `s8`, `s9`)."""
    return sorted(_entries())


def _entry(name: str) -> EntryPoint:
    if name not in _entries():
        raise KeyError(f"no recipe {name!r}; the installed ones are {', '.join(list_recipes()) or 'none'} "
                       "(pip install -e . declares them)")
    return _entries()[name]


def get_recipe(name: str) -> Recipe:
    """The `Recipe` called `name`, imported from its script."""
    return _entry(name).load()


def recipe_script(name: str) -> str:
    """The script that trains recipe `name`, relative to the repository (`recipes/s8_norms.py`)."""
    return _entry(name).module.replace('.', '/') + '.py'
