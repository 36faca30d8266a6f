"""The auth domain: who the caller is, and administration of Firebase users' roles and sessions."""
