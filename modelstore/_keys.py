"""Document keys of the Couchbase store.

Model names never contain ':' and never start with '_' (see
``modelstore.names``), so '::' separates key parts without ambiguity and
keys starting with '_' can never collide with a model's documents.
"""

ARTIFACTS = "artifacts"
METADATA = "metadata"
HEADS = "heads"
PREDICTIONS = "predictions"
COLLECTIONS = (ARTIFACTS, METADATA, HEADS, PREDICTIONS)

# JSON document in the metadata collection: {"models": [sorted names]}.
MODEL_INDEX = "_models"


def head(model: str) -> str:
    return model


def metadata(model: str, publish_id: str) -> str:
    return f"{model}::{publish_id}"


def version_pointer(model: str, version: int) -> str:
    return f"{model}::v::{version}"


def chunk(model: str, publish_id: str, kind: str, index: int) -> str:
    return f"{model}::{publish_id}::{kind}::{index}"


def prediction(model: str, key: str) -> str:
    return f"{model}::p::{key}"
