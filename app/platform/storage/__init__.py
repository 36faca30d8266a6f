"""Object storage: the port the files domain uses and its adapters (local disk, Supabase Storage)."""
