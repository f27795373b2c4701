"""Grad-CAM and Grad-CAM++ heatmaps for covidx classifiers.

Grad-CAM (Selvaraju et al., "Grad-CAM: visual explanations from deep networks
via gradient-based localization", IJCV 2020, Sec. 3, Eqs. 1-2):

    w_k = mean_ij dS_c / dA^k_ij,      L_c = ReLU(sum_k w_k A^k)

Grad-CAM++ (Chattopadhyay et al., WACV 2018, Sec. 3, Eqs. 10 and 19) replaces
the plain spatial mean with pixel-wise weights. With Y_c = exp(S_c) and a
piecewise-linear (ReLU) network, the higher derivatives of Y_c are powers of
g = dS_c/dA times exp(S_c), and the closed form becomes

    alpha^k_ij = g_ij^2 / (2 g_ij^2 + sum_ab A^k_ab g_ij^3),
    w_k = sum_ij alpha^k_ij ReLU(exp(S_c) g_ij).

The exp(S_c) factor is a positive constant per image; it cancels in the
per-image normalisation, so it is left out (it also overflows for large logits).

Both are used by the cascade paper (Cascade-SEMEnet, Sec. 3.3, Figs. 11, 13, 16)
to show where the network looks; it matters for COVID-19 models because they learn
shortcuts (DeGrave, Janizek & Lee, Nat. Mach. Intell. 2021) and :mod:`covidx.explain.audit` turns the
heatmaps into a number.

Implementation notes
--------------------
* The score S_c is the class logit *before* the softmax (Grad-CAM paper,
  Sec. 3: "y^c, before the softmax"). covidx classifiers end in
  ``Dense(num_classes, activation="softmax")``, so the logit is recomputed
  from that Dense layer's input and its own kernel/bias inside the tape. This
  was chosen over swapping the activation to linear for the duration of the
  call because it never mutates the model: nothing can be left altered if an
  exception escapes, it is safe with several explainers sharing one model,
  and no traced ``tf.function`` of the model can hold the stale activation.
  A trailing ``Activation("softmax")``/``Softmax`` layer is handled by taking
  its input; any other head falls back to the output probability.
* Functional models whose backbone was built on the outer input (covidx's
  convention, :mod:`covidx.models.baseline`) get one feature model
  ``keras.Model(model.inputs, [layer.output, ..., model.output])``.
* A backbone nested as a sub-model cannot be reached that way ("Graph
  disconnected" / "Output ... is not connected to inputs" in Keras 3). For those the stored graph of the outer model is executed node by
  node, descending into the nested model's own graph, so the feature map and
  the final output come from one and the same forward pass. Nothing is
  rebuilt or cloned, so this also works on a model reloaded from ``.keras``.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

_POOLING = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)

# Number of candidate names quoted in the error for a missing layer name.
_MAX_LISTED = 25


# ---------------------------------------------------------------------------
# Finding layers (also inside nested sub-models)
# ---------------------------------------------------------------------------


def _is_graph_model(layer) -> bool:
    """True for Functional and Sequential models (their layers can be walked)."""
    return isinstance(layer, keras.Sequential) or (
        isinstance(layer, keras.Model) and getattr(layer, "_nodes_by_depth", None) is not None
    )


def iter_layers(model: keras.Model, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, keras.layers.Layer]]:
    """Yield ``(path, layer)`` for every non-input layer, in graph order.

    Nested Functional/Sequential sub-models are expanded in place; their
    layers get paths ``"submodel/layer"``.
    """
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        path = prefix + (layer.name,)
        if _is_graph_model(layer):
            yield from iter_layers(layer, path)
        else:
            yield "/".join(path), layer


def _output_shape(layer) -> tuple | None:
    try:
        return tuple(layer.output.shape)
    except (AttributeError, ValueError):  # layer never called symbolically
        return None


def _is_spatial(layer) -> bool:
    """4-D output (N, H, W, C) that is a real feature map, not an SE-style 1x1 gate."""
    shape = _output_shape(layer)
    return shape is not None and len(shape) == 4 and not (shape[1] == 1 and shape[2] == 1)


def candidate_layers(model: keras.Model) -> list[str]:
    """Paths of all layers Grad-CAM can target (4-D spatial outputs), input side first."""
    return [path for path, layer in iter_layers(model) if _is_spatial(layer)]


def find_target_layer(model: keras.Model, layer=None) -> tuple[str, keras.layers.Layer]:
    """Resolve the Grad-CAM target layer; return ``(path, layer)``.

    Args:
        model: a Functional or Sequential classifier, possibly with nested sub-models.
        layer: ``None`` for the last layer with a 4-D output (the last feature
            map before global pooling / the classifier; a trailing max/average
            pooling layer is passed over for the map it pools), a layer name (searched
            in nested sub-models too; use ``"submodel/layer"`` when a name is
            ambiguous) or a layer instance.

    Raises:
        ValueError: the name is missing, ambiguous or not a 4-D layer; the
            message lists the candidate names.
    """
    if not _is_graph_model(model):
        raise TypeError(
            f"Grad-CAM needs a Functional or Sequential model, got {type(model).__name__}: "
            "a subclassed model has no graph whose layers can be reached"
        )
    layers = list(iter_layers(model))
    candidates = [path for path, lyr in layers if _is_spatial(lyr)]

    def listing() -> str:
        shown = candidates[-_MAX_LISTED:]
        more = len(candidates) - len(shown)
        head = f"{more} earlier ones not shown, then " if more else ""
        return f"layers with a 4-D output ({len(candidates)}; {head}closest to the classifier last): " + ", ".join(shown)

    if layer is None:
        if not candidates:
            raise ValueError(f"model {model.name!r} has no layer with a 4-D spatial output to explain")
        by_path = dict(layers)
        # A trailing max/average pooling only halves the resolution of the last
        # conv map (VGG's block5_pool): prefer the map it pools.
        unpooled = [p for p in candidates if not isinstance(by_path[p], _POOLING)]
        path = (unpooled or candidates)[-1]
        return path, by_path[path]
    if isinstance(layer, keras.layers.Layer):
        matches = [(p, lyr) for p, lyr in layers if lyr is layer]
        if not matches:
            raise ValueError(f"layer {layer.name!r} is not part of model {model.name!r}; {listing()}")
    else:
        name = str(layer)
        key = (lambda p: p) if "/" in name else (lambda p: p.rsplit("/", 1)[-1])
        matches = [(p, lyr) for p, lyr in layers if key(p) == name]
        if not matches:
            raise ValueError(f"no layer named {name!r} in model {model.name!r}; {listing()}")
        if len(matches) > 1:
            raise ValueError(
                f"layer name {name!r} is ambiguous in model {model.name!r}: "
                + ", ".join(p for p, _ in matches)
                + "; pass the full path 'submodel/layer'"
            )
    path, found = matches[0]
    if not _is_spatial(found):
        raise ValueError(
            f"layer {path!r} has output shape {_output_shape(found)}, not a 4-D feature map; {listing()}"
        )
    return path, found


def _output_layer(model: keras.Model) -> keras.layers.Layer:
    """The layer producing the model's (single) output, looking inside nested models."""
    if isinstance(model, keras.Sequential):
        last = model.layers[-1]
    else:
        if len(model.outputs) != 1:
            raise ValueError(f"Grad-CAM needs a single-output classifier; {model.name!r} has {len(model.outputs)} outputs")
        last = model.outputs[0]._keras_history.operation
    return _output_layer(last) if _is_graph_model(last) else last


def _activation_name(layer) -> str:
    return getattr(getattr(layer, "activation", None), "__name__", "")


# ---------------------------------------------------------------------------
# Running the model while capturing intermediate tensors
# ---------------------------------------------------------------------------


class _FeatureRunner:
    """One forward pass returning target feature maps, the pre-activation score input and the output.

    ``score_kind`` is ``"logit"`` when the pre-softmax score can be recovered
    (see module notes), else ``"probability"``.
    """

    def __init__(self, model: keras.Model, targets: Sequence[keras.layers.Layer]):
        self.model = model
        self.targets = list(targets)
        head = _output_layer(model)
        if isinstance(head, keras.layers.Dense) and _activation_name(head) in ("softmax", "sigmoid"):
            self.head, self.score_kind = head, "logit"  # recompute x @ kernel + bias
        elif isinstance(head, keras.layers.Softmax) or (
            isinstance(head, keras.layers.Activation) and _activation_name(head) in ("softmax", "sigmoid")
        ):
            self.head, self.score_kind = head, "logit"  # the activation's input is the logit
        else:
            self.head, self.score_kind = None, "probability"

        direct = {id(layer) for layer in model.layers}
        wanted = self.targets + ([self.head] if self.head is not None else [])
        self.flat = not isinstance(model, keras.Sequential) and all(id(layer) in direct for layer in wanted)
        if self.flat:
            outputs = [t.output for t in self.targets]
            outputs += [self.head.input] if self.head is not None else []
            self._feature_model = keras.Model(model.inputs, outputs + [model.outputs[0]])
        else:
            # Nested models that must be entered because they hold a wanted layer.
            self._containers: set[int] = set()
            for layer in wanted:
                self._containers |= {id(m) for m in _ancestors(model, layer)}
            self._target_ids = [id(t) for t in self.targets]
            self._head_id = id(self.head) if self.head is not None else None

    # -- public -------------------------------------------------------------
    def __call__(self, x) -> tuple[list, "tf.Tensor | None", "tf.Tensor"]:
        if self.flat:
            values = self._feature_model(x, training=False)
            n = len(self.targets)
            features, rest = list(values[:n]), list(values[n:])
            head_input = rest[0] if self.head is not None else None
            return features, head_input, rest[-1]
        captured: dict[int, object] = {}
        output = self._forward(self.model, x, captured)
        missing = [t.name for t in self.targets if id(t) not in captured]
        if missing:
            raise RuntimeError(f"layers {missing} were not reached in the forward pass of {self.model.name!r}")
        return [captured[i] for i in self._target_ids], captured.get(self._head_id), output

    def class_scores(self, head_input, output) -> tf.Tensor:
        """(N, K) float32 scores S: logits when recoverable, else the output probabilities."""
        if self.score_kind == "probability":
            return tf.cast(output, tf.float32)
        h = tf.cast(head_input, tf.float32)
        if isinstance(self.head, keras.layers.Dense):
            # Same affine map as Dense.call, without the activation; the head is
            # float32 in covidx (mixed precision keeps the classifier in float32).
            h = tf.matmul(h, tf.cast(self.head.kernel, tf.float32))
            if self.head.use_bias:
                h = h + tf.cast(self.head.bias, tf.float32)
        return h

    # -- graph execution for nested models ------------------------------------
    def _forward(self, model, inputs, captured):
        if isinstance(model, keras.Sequential):
            x = inputs
            for layer in model.layers:
                x = self._call(layer, captured, x)
            return x
        return model._run_through_graph(inputs, call_fn=lambda op, *a, **k: self._call(op, captured, *a, **k))

    def _call(self, op, captured, *args, **kwargs):
        if id(op) in self._containers:
            # Descend into the nested model's own graph instead of calling it as
            # one opaque layer; its training/mask kwargs are inference defaults.
            return self._forward(op, args[0] if len(args) == 1 else list(args), captured)
        if "training" in inspect.signature(op.call).parameters and "training" not in kwargs:
            kwargs["training"] = False
        if id(op) == self._head_id:
            captured[id(op)] = args[0]
        out = op(*args, **kwargs)
        if id(op) in self._target_ids:
            captured[id(op)] = out
        return out


def _ancestors(model, layer) -> list:
    """Nested models (outermost first) on the way from ``model`` down to ``layer``; [] if direct."""
    for sub in model.layers:
        if sub is layer:
            return []
        if _is_graph_model(sub):
            if any(inner is layer for _, inner in iter_layers(sub)):
                return [sub] + _ancestors(sub, layer)
    return []


# ---------------------------------------------------------------------------
# Grad-CAM computation
# ---------------------------------------------------------------------------


@dataclass
class GradCAMResult:
    """Grad-CAM output for a batch.

    Attributes:
        heatmaps: (N, H, W) float32 in [0, 1], bilinearly upsampled to the input size.
        cams: (N, h, w) float32 in [0, 1] at the target layer's resolution.
        class_indices: (N,) class explained per image.
        probabilities: (N, K) model output.
        layer: path of the target layer.
        score_kind: ``"logit"`` (pre-softmax) or ``"probability"``.
    """

    heatmaps: np.ndarray
    cams: np.ndarray
    class_indices: np.ndarray
    probabilities: np.ndarray
    layer: str
    score_kind: str


def normalize_per_image(maps: np.ndarray) -> np.ndarray:
    """Divide each (…, H, W) map by its maximum; all-zero maps stay zero."""
    maps = np.asarray(maps, np.float32)
    peak = maps.max(axis=(-2, -1), keepdims=True)
    return np.where(peak > 0, maps / np.where(peak > 0, peak, 1.0), 0.0).astype(np.float32)


def channel_weights(features: np.ndarray, gradients: np.ndarray, plus_plus: bool = False) -> np.ndarray:
    """(N, K) channel weights from (N, h, w, K) feature maps and score gradients.

    Grad-CAM: spatial mean of the gradients (Selvaraju et al., Eq. 1).
    Grad-CAM++: closed-form alpha (Chattopadhyay et al., Eq. 19) times ReLU(gradient), summed.
    """
    a = np.asarray(features, np.float64)
    g = np.asarray(gradients, np.float64)
    if not plus_plus:
        return g.mean(axis=(1, 2))
    g2, g3 = g**2, g**3
    denom = 2.0 * g2 + a.sum(axis=(1, 2), keepdims=True) * g3
    safe = np.where(denom != 0.0, denom, 1.0)  # alpha = 0 where the gradient is 0
    alpha = np.where(denom != 0.0, g2 / safe, 0.0)
    return (alpha * np.maximum(g, 0.0)).sum(axis=(1, 2))


def _cams(features, gradients, plus_plus: bool) -> np.ndarray:
    weights = channel_weights(features, gradients, plus_plus)
    cam = np.einsum("nhwk,nk->nhw", np.asarray(features, np.float64), weights)
    return normalize_per_image(np.maximum(cam, 0.0))


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (N, h, w) maps to ``size`` (H, W), clipped to [0, 1]."""
    out = tf.image.resize(np.asarray(maps, np.float32)[..., None], size, method="bilinear")
    return np.clip(out.numpy()[..., 0], 0.0, 1.0)


def _as_batch(images, model: keras.Model) -> np.ndarray:
    """(N, H, W, C) float32 from a batch, one (H, W, C) image or one (H, W) grayscale image."""
    x = np.asarray(images, np.float32)
    channels = model.inputs[0].shape[-1] if getattr(model, "inputs", None) else None
    if x.ndim == 2:
        x = x[None, ..., None]
    elif x.ndim == 3:
        if channels is not None and x.shape[-1] != channels:
            raise ValueError(f"image of shape {x.shape} does not match the model's {channels} channel(s)")
        x = x[None]
    elif x.ndim != 4:
        raise ValueError(f"expected (N, H, W, C), (H, W, C) or (H, W) images, got shape {x.shape}")
    return x


def _requested_classes(class_index, n: int, k: int) -> np.ndarray:
    """Per-image class to explain; -1 means the predicted class (resolved inside the graph)."""
    if class_index is None:
        return np.full((n,), -1, np.int32)
    classes = np.broadcast_to(np.asarray(class_index, np.int64), (n,)).astype(np.int32)
    if classes.min() < 0 or classes.max() >= k:
        raise ValueError(f"class index {class_index} out of range for {k} classes")
    return classes


_RUNNERS: "OrderedDict[tuple, _FeatureRunner]" = OrderedDict()
_RUNNERS_KEPT = 4


def _runner_for(model: keras.Model, targets: Sequence[keras.layers.Layer]) -> _FeatureRunner:
    """The runner of ``model`` and its target layers, reused from call to call.

    Each new runner traces its own gradient step, i.e. the whole model again (tens of seconds for
    the three-backbone ensemble), so code that explains batch after batch must not get a new one per
    batch. The last few are kept, with strong references, so an id cannot be reused while cached.
    """
    key = (id(model), *map(id, targets))
    runner = _RUNNERS.pop(key, None) or _FeatureRunner(model, targets)
    _RUNNERS[key] = runner
    while len(_RUNNERS) > _RUNNERS_KEPT:
        _RUNNERS.popitem(last=False)
    return runner


def _gradient_step(runner: _FeatureRunner):
    """The forward pass and the gradients of the class scores as one compiled function (cached per runner).

    Eager calls would re-trace every grouped convolution (DPN) on each batch; one tf.function keeps
    Grad-CAM batched and fast.
    """
    if getattr(runner, "_step", None) is None:
        @tf.function(reduce_retracing=True)
        def step(x, requested):
            with tf.GradientTape() as tape:
                # Watch the input: a frozen (non-trainable) model has no watched variables.
                tape.watch(x)
                features, head_input, output = runner(x)
                predicted = tf.argmax(output, axis=-1, output_type=tf.int32)
                classes = tf.where(requested >= 0, requested, predicted)
                scores = runner.class_scores(head_input, output)
                # Summing over the batch keeps per-image gradients separate (no cross-image terms at inference).
                score = tf.reduce_sum(tf.gather(scores, classes, batch_dims=1))
            return features, tape.gradient(score, features), output, classes

        runner._step = step
    return runner._step


def _run_gradcam(runner: _FeatureRunner, images, class_index, plus_plus: bool):
    """One tape over the whole batch -> ([(cams_layer)], classes, probabilities)."""
    x = tf.convert_to_tensor(_as_batch(images, runner.model))
    k = int(runner.model.outputs[0].shape[-1])
    requested = tf.constant(_requested_classes(class_index, int(x.shape[0]), k))
    features, gradients, output, classes = _gradient_step(runner)(x, requested)
    size = tuple(x.shape[1:3])
    cams = [_cams(np.asarray(f), np.asarray(g), plus_plus) for f, g in zip(features, gradients)]
    return ([(upsample(c, size), c) for c in cams], np.asarray(classes).astype(np.int64),
            np.asarray(output, np.float32))


class GradCAM:
    """Grad-CAM / Grad-CAM++ explainer bound to a model and a target layer.

    Args:
        model: Functional or Sequential classifier taking [0, 255] pixels.
        layer: target layer name, path (``"backbone/relu"``), instance, or
            ``None`` for the last 4-D layer (see :func:`find_target_layer`).
        plus_plus: use the Grad-CAM++ channel weights.

    Example:
        >>> cam = GradCAM(model)            # last conv feature map
        >>> heatmaps = cam(images)          # (N, H, W) in [0, 1], predicted class
        >>> result = cam.explain(images, class_index=0)
    """

    def __init__(self, model: keras.Model, layer=None, plus_plus: bool = False):
        self.model = model
        self.plus_plus = plus_plus
        self.layer_path, self.layer = find_target_layer(model, layer)
        self._runner = _runner_for(model, [self.layer])

    @property
    def score_kind(self) -> str:
        return self._runner.score_kind

    def explain(self, images, class_index=None) -> GradCAMResult:
        """Heatmaps for ``images`` (batch, one RGB/1-channel image or a 2-D image).

        ``class_index``: ``None`` (predicted class per image), an int, or one int per image.
        """
        [(heatmaps, cams)], classes, probabilities = _run_gradcam(self._runner, images, class_index, self.plus_plus)
        return GradCAMResult(heatmaps, cams, classes, probabilities, self.layer_path, self.score_kind)

    def __call__(self, images, class_index=None) -> np.ndarray:
        return self.explain(images, class_index).heatmaps


def gradcam_for_layers(
    model: keras.Model, images, layers: Sequence, class_index=None, plus_plus: bool = False
) -> dict[str, GradCAMResult]:
    """Grad-CAM for several target layers from one forward pass and one tape.

    Meant for multi-branch models (e.g. the concatenated DenseNet121 +
    EfficientNetB0 ensemble): pass each branch's last feature map and merge
    the results with :func:`combine_heatmaps`. All layers explain the same
    class (the model's prediction unless ``class_index`` is given).
    """
    resolved = [find_target_layer(model, layer) for layer in layers]
    runner = _runner_for(model, [layer for _, layer in resolved])
    maps, classes, probabilities = _run_gradcam(runner, images, class_index, plus_plus)
    return {
        path: GradCAMResult(heat, cam, classes, probabilities, path, runner.score_kind)
        for (path, _), (heat, cam) in zip(resolved, maps)
    }


def combine_heatmaps(heatmaps: Sequence[np.ndarray], weights: Sequence[float] | None = None, normalize: bool = True) -> np.ndarray:
    """Mean (or weighted mean) of same-shaped heatmaps, e.g. one per ensemble branch.

    Args:
        heatmaps: sequence of arrays shaped (N, H, W) or (H, W).
        weights: non-negative weights, one per heatmap (normalised to sum 1); ``None`` = plain mean.
        normalize: rescale each combined map to max 1 (the single-map convention).
    """
    maps = np.stack([np.asarray(h, np.float32) for h in heatmaps])
    if weights is None:
        w = np.full(len(maps), 1.0 / len(maps))
    else:
        w = np.asarray(weights, np.float64)
        if w.shape != (len(maps),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"need {len(maps)} non-negative weights with a positive sum, got {weights}")
        w = w / w.sum()
    combined = np.tensordot(w, maps, axes=1).astype(np.float32)
    return normalize_per_image(combined) if normalize else combined
