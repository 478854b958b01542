"""Helpers shared by the test modules, grouped by topic. Test modules and conftests import shared code from here,
never from one another; fixtures stay in the conftest.py files."""
