"""Dataset facts: the BTCV label table and standard split, in one place for real-data prep and phantoms alike."""

from __future__ import annotations

__all__ = ["BTCV_LABELS", "BTCV_TRAIN_IDS", "BTCV_VAL_IDS"]

BTCV_LABELS = {
    0: "background", 1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "esophagus",
    6: "liver", 7: "stomach", 8: "aorta", 9: "inferior vena cava", 10: "portal and splenic veins",
    11: "pancreas", 12: "right adrenal gland", 13: "left adrenal gland",
}
BTCV_TRAIN_IDS = tuple(list(range(1, 11)) + list(range(21, 35)))  # the 24 training cases of dataset_0.json
BTCV_VAL_IDS = tuple(range(35, 41))  # the 6 validation cases
