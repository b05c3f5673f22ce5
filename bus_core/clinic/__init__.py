"""Clinic: saved cases and their reviews, accounts, retraining on reviewed cases and the
safety gate before a retrained model reaches the clinic."""
