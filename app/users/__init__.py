"""User profiles: one per Firebase user, served by functions.user.v1.UserService."""
