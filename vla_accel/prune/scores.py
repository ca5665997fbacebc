"""Which query rows score the visual tokens, without full attention matrices.

The executor computes, at a layer the pruning decisions ask for, the softmax mass each key receives from a
few query rows, averaged over heads and those rows (`vla_accel.model.llama.key_mass_from_rows`: the rows
against all keys, never an [S, S] matrix). This file picks the rows by their ORIGINAL position, so it works
on pruned sequences. Only visual tokens are ever dropped and the order never changes, so a non-visual token
at original position p sits at index p - (visual tokens dropped so far) of its sample:

    position 0             BOS
    1 .. 256               third-person patches (camera 0)   -> visual slot 0 .. 255
    257 .. 512             wrist patches (camera 1)          -> visual slot 256 .. 511
    513                    proprio
    514 .. 512 + P         prompt tokens 1 .. P-1 (P = prompt length incl. BOS and the trailing 29871)
    then 56 placeholders and the stop token.
"""

from __future__ import annotations

import numpy as np


def query_window(prompt_lens: np.ndarray, n_vis: int, skip: int) -> tuple[np.ndarray, np.ndarray]:
    """Original positions [lo, hi] (inclusive, per sample) of the prompt tokens used as score queries:
    prompt tokens `1 + skip .. P - 1` (the trailing 29871 included). A prompt too short for `skip`
    uses all its tokens after BOS. Host (numpy) int64 [B] in and out."""
    n_after_bos = prompt_lens - 1  # prompt tokens after BOS
    lo = n_vis + 2 + np.where(n_after_bos > skip, skip, 0)
    hi = n_vis + prompt_lens
    return lo, hi


def window_rows(start: np.ndarray, count: np.ndarray, R: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows start_b .. start_b + count_b - 1 of each sample -> (row_idx [B, R] int64, row_valid [B, R] bool), on
    the host (numpy).

    R >= max(count) is given by the caller (known from the prompt lengths: no device sync); surplus entries
    point at row 0 and are invalid.
    """
    r = np.arange(R)[None]
    valid = r < count[:, None]
    return np.where(valid, start[:, None] + r, 0), valid
