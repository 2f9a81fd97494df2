"""A door governed by autonomic: the sample user project of autonomic's tests."""
