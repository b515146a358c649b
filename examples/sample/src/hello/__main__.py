print("hello from a blobmount mount")
