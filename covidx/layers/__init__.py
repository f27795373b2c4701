"""Custom Keras layers, each serializable (``covidx>`` package in the Keras registry)."""

from covidx.layers.attention import AttentionPooling, MultiscaleAttention
from covidx.layers.cascade import CascadeGate, LungMasking
from covidx.layers.grouped_conv import GroupedConv2D
from covidx.layers.moex import MomentExchange
from covidx.layers.normalization import ImageNormalization, FusedBatchNormalization
from covidx.layers.squeeze_excite import SqueezeExcite

__all__ = [
    "AttentionPooling", "CascadeGate", "GroupedConv2D", "LungMasking", "ImageNormalization",
    "FusedBatchNormalization", "MomentExchange", "MultiscaleAttention", "SqueezeExcite",
]
