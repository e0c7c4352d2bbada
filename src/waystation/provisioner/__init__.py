"""The provisioner daemon (`waystation provisioner`) and its provisioners."""
