"""The supervisor's side of the capabilities a worker cannot serve alone, one module each.

Each module serves its capability's host requests (``_host.HostRequests``
dispatches them by capability) and keeps what the capability needs beside the
event store. ``grants`` reads each capability's policy settings.
"""
