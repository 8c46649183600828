// The app of syncgate's front-door tests (tests/front_door.rs): one table and its legacy
// permissions, shared by the real zero-cache (`zero-deploy-permissions --schema-path schema.js`
// writes the permissions into PostgreSQL) and the real Zero client (front_door.mjs imports
// `schema`), so both sides agree on every column.
//
// PostgreSQL holds the table (tests/common/upstream.rs creates and seeds it):
//
//   CREATE TABLE item (id text PRIMARY KEY, owner text NOT NULL, title text NOT NULL);
//
// Who may do what, by the token's `sub` (zero-cache checks the HS256 token against
// ZERO_AUTH_SECRET and hands its claims to these rules as `auth`):
//
//   select, insert, update, delete: rows whose owner is 'public', and rows whose owner is the
//                                   token's `sub`. A client without a token has no `sub`, so
//                                   it reads and writes only the public rows.
//
// So what a client sees is observable proof of whose token reached zero-cache: with alice's
// token it sees the public rows and alice's; without one, only the public rows; and an insert
// of a row owned by someone else is refused by zero-cache (the mutation is acknowledged and
// dropped, the row never reaches PostgreSQL).

import {createSchema, definePermissions, string, table} from '@rocicorp/zero';

const item = table('item')
  .columns({id: string(), owner: string(), title: string()})
  .primaryKey('id');

export const schema = createSchema({
  tables: [item],
  enableLegacyQueries: true,
  enableLegacyMutators: true,
});

/** Public rows, and the rows of the token's user. */
const publicOrOwn = (auth, {cmp, or}) => or(cmp('owner', 'public'), cmp('owner', auth.sub));

export const permissions = definePermissions(schema, () => ({
  item: {
    row: {
      select: [publicOrOwn],
      insert: [publicOrOwn],
      update: {preMutation: [publicOrOwn], postMutation: [publicOrOwn]},
      delete: [publicOrOwn],
    },
  },
}));
