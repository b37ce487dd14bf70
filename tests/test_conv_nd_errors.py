"""Bad input to the N-d, grouped and depthwise convs: the same checks as TTConv2d's (tests/test_errors.py), for the
1-D and 3-D classes, and the new ones (groups that do not divide, in_shape of a depthwise conv). Each row is one
row of docs/errors.md (``test_conv_nd_errors.py::test_bad_conv_nd_input[<id>]``)."""
import warnings

import pytest
import torch
from torch import nn

from tnlayers.layers import TensorizedConv1d, TensorizedConv3d, TTConv1d, TTConv2d, TTConv3d, TuckerConv3d

ROWS = [
    ("conv1d-in-channels-zero", lambda: TTConv1d(0, 4, 3, rank=2), ValueError, "in_channels must be a positive int"),
    ("conv3d-out-channels-float", lambda: TTConv3d(4, 4.0, 3, rank=2), ValueError, "out_channels must be a positive"),
    ("conv1d-kernel-pair", lambda: TTConv1d(4, 4, (3, 3), rank=2), ValueError,
     r"kernel_size must be a positive int or a 1-tuple of positive ints, got \(3, 3\)"),
    ("conv3d-kernel-pair", lambda: TTConv3d(4, 4, (3, 3), rank=2), ValueError,
     r"kernel_size must be a positive int or a triple of positive ints, got \(3, 3\)"),
    ("conv3d-stride-zero", lambda: TTConv3d(4, 4, 3, stride=(1, 0, 1), rank=2), ValueError, "stride must be"),
    ("conv1d-dilation-negative", lambda: TTConv1d(4, 4, 3, dilation=-1, rank=2), ValueError, "dilation must be"),
    ("conv3d-padding-negative", lambda: TTConv3d(4, 4, 3, padding=(1, -1, 1), rank=2), ValueError,
     "padding must be a non-negative int, a triple of them, 'same' or 'valid'"),
    ("conv1d-padding-unknown", lambda: TTConv1d(4, 4, 3, padding="full", rank=2), ValueError,
     "padding must be an int, a 1-tuple of ints, 'same' or 'valid', got 'full'"),
    ("conv3d-same-strided", lambda: TTConv3d(4, 4, 3, stride=(1, 2, 1), padding="same", rank=2), ValueError,
     "padding='same' is not supported for strided convolutions"),
    ("conv1d-padding-mode", lambda: TTConv1d(4, 4, 3, padding_mode="mirror", rank=2), ValueError, "padding_mode"),
    ("conv3d-groups-str", lambda: TTConv3d(4, 4, 3, groups="2", rank=2), TypeError, "groups must be an int"),
    ("conv1d-groups-zero", lambda: TTConv1d(4, 4, 3, groups=0, rank=2), ValueError, "groups must be a positive int"),
    ("conv-groups-not-dividing-in", lambda: TTConv3d(6, 8, 3, groups=4, rank=2), ValueError,
     "groups=4 must divide in_channels=6 and out_channels=8"),
    ("conv-groups-not-dividing-out", lambda: TTConv1d(8, 6, 3, groups=4, rank=2), ValueError,
     "groups=4 must divide in_channels=8 and out_channels=6"),
    ("conv-depthwise-in-shape", lambda: TTConv2d(8, 8, 3, groups=8, rank=2, in_shape=(1,)), ValueError,
     r"in_shape: TTConv2d is depthwise \(one input channel per group\)"),
    ("conv-depthwise-factorized", lambda: TTConv1d(8, 8, 3, groups=8, rank=2, strategy="factorized"), ValueError,
     r"strategy='factorized': TTConv1d is depthwise \(one input channel per group\), which has no factorized chain"),
    ("conv3d-format-missing", lambda: TensorizedConv3d(4, 4, 3, rank=2), TypeError, "TensorizedConv3d needs format="),
    ("conv1d-format-conflict", lambda: TTConv1d(4, 4, 3, rank=2, format="cp"), ValueError,
     "TTConv1d is format 'tt'; got format='cp'"),
    ("conv3d-rank-float", lambda: TuckerConv3d(4, 4, 3, rank=1.5), ValueError, r"must be in \(0, 1\]"),
    ("conv1d-forward-channels", lambda: TTConv1d(4, 4, 3, rank=2)(torch.randn(1, 3, 5)), ValueError,
     r"TTConv1d expects input of shape \(N, 4, L\) or \(4, L\), got \(1, 3, 5\)"),
    ("conv3d-forward-dims", lambda: TTConv3d(4, 4, 3, rank=2)(torch.randn(1, 4, 5, 5)), ValueError,
     r"TTConv3d expects input of shape \(N, 4, D, H, W\) or \(4, D, H, W\), got \(1, 4, 5, 5\)"),
    ("conv3d-forward-too-small", lambda: TTConv3d(4, 4, 3, rank=2)(torch.randn(1, 4, 5, 2, 5)), ValueError,
     r"TTConv3d: input of spatial size \(5, 2, 5\) \(padded \(5, 2, 5\)\) is smaller than the dilated kernel"),
    ("conv1d-forward-dtype", lambda: TensorizedConv1d(4, 4, 3, rank=2, format="cp")(torch.randn(1, 4, 5).double()),
     TypeError, "got an input of dtype torch.float64, but its cores are torch.float32"),
    ("conv1d-from-dense-type", lambda: TTConv1d.from_dense(nn.Conv2d(4, 4, 3), rank=2), TypeError,
     "TTConv1d.from_dense expects an nn.Conv1d, got Conv2d"),
    ("conv3d-from-dense-type", lambda: TTConv3d.from_dense(nn.Conv1d(4, 4, 3), rank=2), TypeError,
     "TTConv3d.from_dense expects an nn.Conv3d, got Conv1d"),
]


@pytest.mark.parametrize("make,error,match", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_conv_nd_input(make, error, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=match):
            make()
