"""What every wing shares: argument checks, parameter resolution by name, the one device-to-host copy."""
