"""One script per assignment; `cifar_fa.registry` finds their recipes by name \
(setup.cfg's `cifar_fa.recipes` entry points)."""
