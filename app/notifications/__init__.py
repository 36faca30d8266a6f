"""Notifications of users: stored, listed, marked read and streamed live by functions.notification.v1.NotificationService."""
