"""Each assignment's rules as `Constraints`: what the recipes train under and what a model is checked against."""
from .constraints import Constraints

__all__ = ['S7', 'S8', 'S9', 'ASSIGNMENTS']

# the epoch caps of S7 and S9 are our goals' (the assignments set none); S8's 20 epochs are the assignment's
S7 = Constraints(max_params=1_000_000, min_rf=44, max_epochs=20, blocks='C1 P1 C2 P2 C3 P3 C4 GAP',
                 need_dilated=True, need_separable=True)
S8 = Constraints(max_params=50_000, max_epochs=20, skeleton='C1 C2 c3 P1 C3 C4 C5 c6 P2 C7 C8 C9 GAP C10')
S9 = Constraints(max_params=200_000, min_rf=44, max_epochs=40, blocks='C1 C2 C3 C4 GAP', block_convs=3,
                 need_dilated=True, need_separable=True)
ASSIGNMENTS = {'s7': S7, 's8': S8, 's9': S9}
