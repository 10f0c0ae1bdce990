"""ctrldiff.train"""
