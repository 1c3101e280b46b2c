"""Load a registered version back: resolve NAME@alias / NAME/version, download it, open an ORT session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.promotion.choose import PromotionError
from pipeline.promotion.publish import VTAG_ENGINE


@dataclass
class LoadedModel:
    """A registered version downloaded to disk, with what the registry says about it."""

    uri: str
    name: str
    version: str
    folder: Path
    onnx_path: Path
    tags: dict[str, str]
    engine_path: Path | None = None

    def session(self, providers: list[str] | None = None):
        """An ONNX Runtime session on the downloaded model (CPU unless providers say otherwise)."""
        import onnxruntime as ort

        from pipeline.backends.ort_cpu import session_options

        opts = session_options()  # the settings the search measured with
        return ort.InferenceSession(str(self.onnx_path), sess_options=opts,
                                    providers=providers or ["CPUExecutionProvider"])


def model_uri(ref: str) -> str:
    """``NAME@alias`` / ``NAME/3`` / ``models:/...`` -> a ``models:/`` URI."""
    ref = ref.strip()
    if ref.startswith("models:/"):
        return ref
    if "@" in ref or "/" in ref:
        return f"models:/{ref}"
    raise PromotionError(f"{ref!r}: give NAME@ALIAS (e.g. digits-mlp@champion), NAME/VERSION, or a models:/ URI")


def load_registered(client, ref: str, dst: str | Path) -> LoadedModel:
    """Resolve ``ref`` in the registry, download its files into ``dst`` and find the ONNX file."""
    import mlflow.artifacts
    import yaml
    from mlflow.exceptions import MlflowException

    uri = model_uri(ref)
    body = uri[len("models:/"):]
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        elif "/" in body and not body.startswith("m-"):
            name, version = body.rsplit("/", 1)
            mv = client.get_model_version(name, version)
        else:
            raise PromotionError(f"{uri}: not a registered model reference (use NAME@ALIAS or NAME/VERSION)")
    except MlflowException as exc:
        raise PromotionError(f"{uri}: not found in the registry at {client._registry_uri}: {exc.message}") from None
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    # Download from the version's storage location rather than through models:/ — MLflow 3.17's
    # models:/ artifact repository resolves names with the *global* registry URI, not this client's.
    storage = client.get_model_version_download_uri(mv.name, str(mv.version))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=storage, dst_path=str(dst),
                                                     tracking_uri=client.tracking_uri))
    meta = yaml.safe_load((local / "MLmodel").read_text()) if (local / "MLmodel").exists() else {}
    data = ((meta.get("flavors") or {}).get("onnx") or {}).get("data")
    onnx_path = local / data if data else next(iter(sorted(local.glob("*.onnx"))), None)
    if onnx_path is None and list(local.glob("*.tflite")):
        tfl = next(iter(sorted(local.glob("*.tflite"))))
        raise PromotionError(f"{uri} is a TFLite model ({tfl}): run it with TensorFlow Lite "
                             f"(tf.lite.Interpreter(model_path={str(tfl)!r})), not ONNX Runtime; `load --dst DIR` "
                             "keeps the file")
    if onnx_path is None or not onnx_path.exists():
        raise PromotionError(f"{uri}: the downloaded model has no ONNX file (files: {sorted(p.name for p in local.iterdir())})")
    engine = mv.tags.get(VTAG_ENGINE)
    return LoadedModel(uri=uri, name=mv.name, version=str(mv.version), folder=local, onnx_path=onnx_path,
                       tags=dict(mv.tags), engine_path=(local / engine) if engine else None)
