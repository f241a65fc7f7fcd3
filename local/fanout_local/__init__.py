"""Local stand-ins for what AWS provides: an upstream to call and a gateway to call through.

Development only: not part of the Lambda layer.
"""
