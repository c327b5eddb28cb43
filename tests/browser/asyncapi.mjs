// Validates an AsyncAPI document with the AsyncAPI initiative's own parser
// (schema, references into docs/schemas, semantic rules): prints every
// diagnostic and a summary, exits 1 on any error or warning.
import { Parser, fromFile } from '@asyncapi/parser';

const file = process.argv[2];
if (!file) {
  console.error('usage: node asyncapi.mjs <asyncapi.yaml>');
  process.exit(2);
}
const { document, diagnostics } = await fromFile(new Parser(), file).parse();
const severity = ['error', 'warning', 'info', 'hint'];
for (const d of diagnostics) {
  console.log(`${severity[d.severity]} ${d.code} ${d.path.join('.')}: ${d.message}`);
}
if (document) {
  console.log(`parsed ${file}: AsyncAPI ${document.version()}, ${document.channels().length} channels, ` +
    `${document.operations().length} operations, ${document.messages().length} messages`);
}
process.exit(document && !diagnostics.some(d => d.severity <= 1) ? 0 : 1);
