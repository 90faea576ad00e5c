"""albumentations as the package and the recipes use it: imported here, with its network update check off."""
import os

os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')  # else every import asks PyPI for a newer release (offline: 2 s)

import albumentations as A  # noqa: E402

__all__ = ['A']
