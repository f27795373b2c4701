"""Custom Keras layers, each serializable (``covidx>`` package in the Keras registry)."""

from covidx.layers.attention import AttentionPooling, MultiscaleAttention
from covidx.layers.cascade import CascadeGate, LungMasking
from covidx.layers.grouped_conv import GroupedConv2D
from covidx.layers.moex import MomentExchange
from covidx.layers.normalization import FusedBatchNormalization, ImageNormalization
from covidx.layers.squeeze_excite import SqueezeExcite

__all__ = [
    "AttentionPooling", "CascadeGate", "FusedBatchNormalization", "GroupedConv2D", "LungMasking",
    "ImageNormalization", "MomentExchange", "MultiscaleAttention", "SqueezeExcite",
]
