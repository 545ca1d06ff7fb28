"""Test doubles: a fake sink (registered as a plugin) and a scripted fake HTTP destination."""
