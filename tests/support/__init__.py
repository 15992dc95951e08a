"""Helpers the tests share (not tests themselves): fakes, texts, model settings, a server runner."""
