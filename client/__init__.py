"""Device-side code of Interlude: key handling, sealing and opening envelopes, the keystore.

Nothing here is imported by the services; private keys never leave the device.
"""
