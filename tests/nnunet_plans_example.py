"""A small nnU-Net plans file in nnU-Net 2.8's format (ResEnc, CTNormalization), for tests that need a plan
but not nnU-Net's planner (tests/test_nnunet_handoff.py runs the planner itself)."""

import json
from pathlib import Path


def write_example_plans(path: Path, patch_size=(160, 160, 160), features=(4, 8, 8, 8, 8, 8)) -> Path:
    """Write a one-configuration (``3d_fullres``) plans JSON with ResEnc-L's topology at small widths."""
    n = len(features)
    plans = {
        "dataset_name": "Dataset999_Example", "plans_name": "nnUNetResEncUNetLPlans", "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "foreground_intensity_properties_per_channel": {"0": {"mean": 80.0, "std": 120.0, "percentile_00_5": -900.0,
                                                              "percentile_99_5": 1200.0}},
        "configurations": {"3d_fullres": {
            "patch_size": list(patch_size), "spacing": [1.5, 1.5, 1.5], "normalization_schemes": ["CTNormalization"],
            "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                "arch_kwargs": {"n_stages": n, "features_per_stage": list(features),
                                "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * n,
                                "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
                                "n_blocks_per_stage": [1, 3, 4, 6, 6, 6, 6][:n], "n_conv_per_stage_decoder": [1] * (n - 1),
                                "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                                "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                                "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}},
    }
    path.write_text(json.dumps(plans, indent=1))
    return path
