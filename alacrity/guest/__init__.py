"""Guests: process guests (a Python driver in another process) and their drivers."""
