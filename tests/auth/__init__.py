"""Tests of proxyd.auth."""
