"""What every layer shares and none owns: updates and hook contexts (`update`), the postprocessor
interface (`hooks`), capabilities and registries (`registry`), the client store (`store`), Ray
placement helpers (`placement`). `fedsim.core` imports nothing else of fedsim."""
