from advisor.cli import console

console()
