"""The embedded default: synthetic shapes served on 127.0.0.1, their pixel judge, and the demo job."""
