"""Elastic layers: parameters at maximum shape, active sizes as traced arguments.

Every elastic module has a dense twin with the same parameter names, so exporting a subnet is
slicing. The package:

* :mod:`~ofajax.layers.common`: channel rounding, prefix masks, lookups, activations, initialisers;
* :mod:`~ofajax.layers.conv`: convolutions with OFA's padding (the fast depthwise one) and tap counts;
* :mod:`~ofajax.layers.cnn`: BatchNorm, conv-BN, depthwise, squeeze-excite and MBConv layers;
* :mod:`~ofajax.layers.resnet`: bottleneck blocks, the residual stem conv, PyTorch's pooling;
* :mod:`~ofajax.layers.transformer`: attention, FFN, encoder layers and their slicing / cost;
* :mod:`~ofajax.layers.gating`: running a block only where a traced depth flag says so;
* :mod:`~ofajax.layers.stats`: slicing BatchNorm statistics to match sliced parameters.

The CNN names are re-exported here (``layers.ElasticConvBN``); the transformer's live in
``ofajax.layers.transformer``.
"""

from ofajax.layers import transformer
from ofajax.layers.cnn import (BlockSpec, ConvBN, DepthwiseConv, ElasticBatchNorm, ElasticConvBN,
                               ElasticDepthwiseConv, ElasticMBConv, ElasticSqueezeExcite, MBConv,
                               SqueezeExcite, active_depthwise_kernels, mbconv_cost, se_channels,
                               transform_name)
from ofajax.layers.common import (ACTIVATIONS, CONV_INIT, LINEAR_INIT, channel_mask, h_sigmoid,
                                  h_swish, lookup, make_divisible)
from ofajax.layers.conv import conv2d, conv_output_size, depthwise_conv2d, spatial_taps
from ofajax.layers.gating import gated
from ofajax.layers.resnet import (Bottleneck, BottleneckSpec, ElasticBottleneck,
                                  ElasticResidualConv, ResidualConv, avg_pool_ceil,
                                  max_pool_3x3_s2, pooled_size)
from ofajax.layers.stats import slice_bn, slice_stats, with_stats

__all__ = ["ACTIVATIONS", "CONV_INIT", "LINEAR_INIT", "BlockSpec", "Bottleneck", "BottleneckSpec",
           "ConvBN", "DepthwiseConv", "ElasticBatchNorm", "ElasticBottleneck", "ElasticConvBN",
           "ElasticDepthwiseConv", "ElasticMBConv", "ElasticResidualConv",
           "ElasticSqueezeExcite", "MBConv", "ResidualConv", "SqueezeExcite",
           "active_depthwise_kernels", "avg_pool_ceil", "channel_mask", "conv2d",
           "conv_output_size", "depthwise_conv2d", "gated", "h_sigmoid", "h_swish", "lookup",
           "make_divisible", "max_pool_3x3_s2", "mbconv_cost", "pooled_size", "se_channels",
           "slice_bn", "slice_stats", "spatial_taps", "transform_name", "transformer",
           "with_stats"]
