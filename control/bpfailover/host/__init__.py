"""Host-side tools: run on the hypervisor, talk to QEMU (QMP) and the guest agent (qemu-ga).

Nothing here imports the agent: the host has no failoverd, only QEMU or libvirt.
"""
