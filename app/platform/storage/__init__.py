"""Object storage: the port the files domain uses and its adapters (local disk, Supabase Storage).

    create_storage(settings)      the adapter that STORAGE_BACKEND names
    LocalStorage.routes()         the routes that serve the local adapter's signed URLs; mount
                                  them in the app when STORAGE_BACKEND=local
    LocalStorage.upload_gate      set it so signed upload URLs stop working once a file is gone
    LocalStorage.remove_stale_temporaries(seconds)
                                  delete the temporary files that a crash left behind
"""

from __future__ import annotations

from app.platform.storage.keys import InvalidKey
from app.platform.storage.port import (
    ObjectAlreadyExists,
    ObjectInfo,
    ObjectNotFound,
    ObjectRejected,
    ObjectStorage,
    StorageError,
    StorageUnavailable,
)

__all__ = [
    "InvalidKey",
    "ObjectAlreadyExists",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectRejected",
    "ObjectStorage",
    "StorageError",
    "StorageUnavailable",
    "create_storage",
]


def create_storage(settings) -> ObjectStorage:
    """Create the adapter that STORAGE_BACKEND names, configured from the settings."""
    if settings.storage_backend == "supabase":
        from app.platform.storage.supabase import SupabaseStorage

        return SupabaseStorage.from_settings(settings)

    from app.platform.storage.local import LocalStorage

    return LocalStorage.from_settings(settings)
